"""One module per CLI command: turn parsed flags into library calls, validating all input first."""
