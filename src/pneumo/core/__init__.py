"""Plumbing every stage stands on: errors and exit codes, labels, atomic files and locks, logging,
progress, device and precision, process settings, ranks, typed configs. It imports nothing above it."""
