"""The learning tasks the studies train on: a character language model, the adding problem."""
