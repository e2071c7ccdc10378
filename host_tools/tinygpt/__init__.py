"""tinygpt host tools: converter, reference, engine binding, CLI."""
