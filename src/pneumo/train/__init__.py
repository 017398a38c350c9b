"""Training: one epoch (engine), a whole run top to bottom (run), its directory, its curves, and the
model it hands over (assemble)."""
