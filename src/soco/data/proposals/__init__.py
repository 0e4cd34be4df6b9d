"""Object proposals: selective search, SoCo's filter, and the on-disk proposal store."""
