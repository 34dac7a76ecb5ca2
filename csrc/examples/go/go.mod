module dmoverexample

go 1.19
