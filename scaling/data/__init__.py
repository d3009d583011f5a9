"""Data: native dataset sources → uniform records → task prompts/targets → batches."""
