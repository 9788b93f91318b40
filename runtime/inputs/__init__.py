"""Inputs as the towers take them: validation, tokenising, decoding, safe fetching, sources."""
