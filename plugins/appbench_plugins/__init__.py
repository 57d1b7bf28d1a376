"""Built-in plugins of appbench, one module each, registered through entry points exactly as a
third-party package would be."""
