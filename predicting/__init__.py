"""Using a trained run on photos it has not seen (predict.py): `tested` loads the run's tested model and its
preprocessing settings from the run folder, `photos` finds and prepares the photos (ingest's own conversion,
then the loaders' test transform), `export` writes the model for use without fastpix and checks its parity."""
