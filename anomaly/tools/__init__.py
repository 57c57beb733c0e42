"""Small command-line helpers that prepare inputs for the methods."""
