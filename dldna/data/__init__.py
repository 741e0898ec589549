from dldna.data.arithmetic import ArithmeticDataset, ArithmeticTokenizer, Problem, arithmetic_dataset, complex_expression, format_answer, pad_batch, parse_answer, safe_eval, simple_expression
