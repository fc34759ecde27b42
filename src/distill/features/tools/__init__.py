"""Research harnesses and analysis for the feature family (imported on demand, not by the plug-in)."""
