"""Data: files and builtin sets -> Conversation -> token ids and labels."""
