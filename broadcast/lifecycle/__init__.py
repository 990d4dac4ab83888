"""A broadcast's life: validation, creation, scheduling, CSV recipients, status and the users cache."""
