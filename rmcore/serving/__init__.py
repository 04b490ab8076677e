"""rmcore over HTTP (the standard library's server): a reward model as a service, and the labeling page."""
