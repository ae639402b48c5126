"""Plugins that ship with explainkit; they register through the same hooks as third parties."""
