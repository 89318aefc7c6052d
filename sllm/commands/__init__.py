"""One module per subcommand. Each imports torch and the core only inside its function body."""
