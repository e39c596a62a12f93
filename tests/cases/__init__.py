"""Shared scenario corpus (data): the REF topology and packet sequences with expected verdicts
and reasons, run by the model tests and the BPF differential tests alike."""
