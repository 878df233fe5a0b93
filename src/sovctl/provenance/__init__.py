"""What this stack is made of, as a document others can check: the bill of materials."""
