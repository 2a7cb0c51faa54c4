"""Training: the jitted step, optimizer, chunked loss, the loop and what it writes."""
