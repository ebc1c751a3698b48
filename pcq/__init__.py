"""pcq: producer -> many-consumer work, on one machine or across many."""
