"""Model providers: Anthropic (real API), FunctionModel and ScriptedModel (no key needed)."""
