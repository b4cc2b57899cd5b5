"""Tasks: their model, the store, the executor and the work they do."""
