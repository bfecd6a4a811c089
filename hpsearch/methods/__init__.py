"""Pure tensor functions behind the stages: one algorithm per module, no model, no config."""
