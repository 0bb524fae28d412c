"""Development tools of the project, not the library: run them from a checkout's root."""
