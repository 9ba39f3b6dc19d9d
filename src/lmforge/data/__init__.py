"""The data layer: raw files -> prepared data folders (`prepare`, per task), the token store
that holds them (`store`), and the datasets and batching that training reads them with."""
