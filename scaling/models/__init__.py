"""Model implementations (no distributed code here: that lives in scaling/training)."""
