"""Signed over-the-air model updates: the signed statement (format, pure), archives, keys and the installed-model
store (store), and the running agent's side: drop folder, smoke test, swap, probation, rollback (manager)."""
