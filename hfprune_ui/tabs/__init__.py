"""One module per dashboard tab; each ``build(ctx)`` lays out its tab and wires its events."""
