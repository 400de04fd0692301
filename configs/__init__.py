"""ml_collections config files; pass one to train.py with --config=configs/NAME.py."""
