"""Private helpers of the client package: atomic files, streaming AES, the progress bar."""
