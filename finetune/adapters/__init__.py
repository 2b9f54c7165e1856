"""After training: merge an adapter into its base (checked by a numerical gate), its model card, what serves
it, and publishing to the Hub."""
