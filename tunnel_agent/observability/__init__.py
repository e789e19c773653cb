"""Seeing what an agent does without logging in: health, readiness, metrics, status, twin."""
