"""One training loop for every stage; each stage contributes a short step. No Ray here."""
