"""Preprocessing of cases: crop, resample, normalise, case cache."""
