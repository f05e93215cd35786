"""Ray Serve application: OpenAI-compatible HTTP ingress in front of a model server that owns
one continuously-batching `Engine`. `build_app(args)` is the `import_path` of the Serve YAML."""
