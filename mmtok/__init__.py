"""The mmtok command line and the end-to-end jobs that tie the stages together."""
