"""Dataset formats: turn one raw record into the text trained on and the spans supervised."""
