"""The HTTP plumbing every route uses: bodies, problems, the acting principal, guards, security, timing."""
