"""Signed over-the-air model updates: the signed statement (format, pure), Ed25519 keys (keys), update archives
signed and verified-unpacked (archive), the installed-model store and its pointer (store), a new model's smoke test
(smoke), and the running agent's side: drop folder, swap, probation, rollback (manager)."""
