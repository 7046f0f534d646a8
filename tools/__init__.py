"""Tools around the model repository: tiny offline checkpoints, the demo, fine-tuning, visualisation, evaluation."""
