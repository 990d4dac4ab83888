"""In-memory adapters of the ports, for the embedded server and the contract suite."""
