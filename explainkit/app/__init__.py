"""The local web app behind ``explainkit serve``: a framework-free workbench and its Gradio UI/API."""
