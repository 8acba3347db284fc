"""The command-line client: `trainserve submit / jobs / predict / follow / logs` over HTTP (httpx)."""
