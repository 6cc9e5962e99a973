"""Test helpers that ship with tollhouse: a fake OpenAI and Anthropic upstream for tests and the demo."""
