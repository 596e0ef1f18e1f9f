package blocklist

// ResetHolderScan lets the next lock timeout search for the holder again.
func ResetHolderScan() { lastHolderScan.Store(0) }
