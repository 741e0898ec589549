from dldna.data.arithmetic import ArithmeticDataset, ArithmeticTokenizer, Problem, arithmetic_dataset, complex_expression, format_answer, pad_batch, parse_answer, safe_eval, simple_expression
from dldna.data.tokenizers import bert_tokenizer, load_hf_tokenizer, load_tokenizer, special_ids, t5_tokenizer
from dldna.data.agnews import AG_NEWS_CLASSES, AGNews, BatchLoader, EncodedTexts, encode_ag_news, encode_texts, load_ag_news, train_val_split
from dldna.data.sequences import SimpleDataset, create_simple_data, expected_continuation, number_stream
from dldna.data.wikisql import lf_metrics, load_wikisql, logical_form, parse_logical_form
