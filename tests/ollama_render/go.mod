module ftcore.test/ollamarender

go 1.21
