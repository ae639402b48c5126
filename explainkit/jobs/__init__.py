"""Jobs: the explain pipeline (scan -> maps -> figures -> summary -> report), its maps store, the
HTML report and run provenance. A job takes a model, explainers, data and options, and writes files."""
