"""fanout-mcp's MCP surface: tools, resources, prompts, transports and the CLI."""
