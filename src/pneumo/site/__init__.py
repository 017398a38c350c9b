"""A model at another hospital: adapting it to a labelled sample (adapt), simulated sites (shift) and
shortcut cues (shortcuts)."""
