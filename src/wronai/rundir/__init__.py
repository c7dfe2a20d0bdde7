"""The run directory, the product's main artefact: every file name in it, with its writers and readers, and provenance."""
