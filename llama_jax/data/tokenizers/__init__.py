"""The three tokenizer formats behind one interface (base.Tokenizer); tokenizer.load picks one."""
