"""The F2LLM v2 source lists: the kind of each of the 502 sources F2LLM v2 trains on.

They are the three lists at the top of the official code's ``F2LLM/utils.py`` (459 retrieval, 10 classification,
33 clustering sources; the v1 sources of :mod:`f2llm.data.sources` come first in each), in its order, written as
whitespace-separated names so that 502 names take a few lines. Only retrieval sources get the in-batch term.
:data:`f2llm.data.sources.SOURCE_KINDS` is built from these lists and the v1 ones.
"""

from __future__ import annotations

# 459 retrieval sources (F2LLM/utils.py RETRIEVAL_DATASETS).
V2_RETRIEVAL_SOURCES: tuple[str, ...] = tuple(
    """
arguana snli mnli anli paq squad stackexchange msmarco natural_questions hotpotqa fever eli5 fiqa bioasq nfcorpus
miracl mrtidy scifact qqp stackoverflowdupquestions sts12 sts22 stsbenchmark amazon_qa cnn_dm coliee paq_part2
pubmedqa s2orc_abstract_citation s2orc_title_abstract s2orc_title_citation sentence_compression specter triviaqa
xsum stackexchange_part2 stackexchangedupquestions_s2s stackexchangedupquestions_p2p webfaq_ara webfaq_aze
webfaq_ben webfaq_bul webfaq_cat webfaq_ces webfaq_dan webfaq_deu webfaq_ell webfaq_eng webfaq_est webfaq_fas
webfaq_fin webfaq_fra webfaq_heb webfaq_hin webfaq_hrv webfaq_hun webfaq_ind webfaq_isl webfaq_ita webfaq_jpn
webfaq_kat webfaq_kaz webfaq_kor webfaq_lav webfaq_lit webfaq_mar webfaq_msa webfaq_nld webfaq_nor webfaq_pol
webfaq_por webfaq_ron webfaq_rus webfaq_slk webfaq_slv webfaq_spa webfaq_sqi webfaq_srp webfaq_swe webfaq_tgl
webfaq_tha webfaq_tur webfaq_ukr webfaq_urd webfaq_uzb webfaq_vie webfaq_zho mmarco_arabic mmarco_chinese
mmarco_dutch mmarco_french mmarco_german mmarco_hindi mmarco_indonesian mmarco_italian mmarco_japanese
mmarco_portuguese mmarco_russian mmarco_spanish mmarco_vietnamese miracl_ar miracl_bn miracl_en miracl_es miracl_fa
miracl_fi miracl_fr miracl_hi miracl_id miracl_ja miracl_ko miracl_ru miracl_sw miracl_te miracl_th miracl_zh
mrtidy_arabic mrtidy_bengali mrtidy_finnish mrtidy_indonesian mrtidy_japanese mrtidy_korean mrtidy_russian
mrtidy_swahili mrtidy_telugu mrtidy_thai mldr_ar mldr_de mldr_en mldr_es mldr_fr mldr_hi mldr_it mldr_ja mldr_ko
mldr_pt mldr_ru mldr_th mldr_zh mkqa_ar mkqa_da mkqa_de mkqa_en mkqa_es mkqa_fi mkqa_fr mkqa_he mkqa_hu mkqa_it
mkqa_ja mkqa_km mkqa_ko mkqa_ms mkqa_nl mkqa_no mkqa_pl mkqa_pt mkqa_ru mkqa_sv mkqa_th mkqa_tr mkqa_vi mkqa_zh_cn
mkqa_zh_hk mkqa_zh_tw sts22_multilingual mlsum_retrieval_de mlsum_retrieval_es mlsum_retrieval_fr mlsum_retrieval_ru
mlsum_retrieval_tr aya muri muri_part2 unpc_ar2en unpc_ar2es unpc_ar2fr unpc_ar2ru unpc_ar2zh unpc_en2ar unpc_en2es
unpc_en2fr unpc_en2ru unpc_en2zh unpc_es2ar unpc_es2en unpc_es2fr unpc_es2ru unpc_es2zh unpc_fr2ar unpc_fr2en
unpc_fr2es unpc_fr2ru unpc_fr2zh unpc_ru2ar unpc_ru2en unpc_ru2es unpc_ru2fr unpc_ru2zh unpc_zh2ar unpc_zh2en
unpc_zh2es unpc_zh2fr unpc_zh2ru xnli_ar xnli_bg xnli_de xnli_el xnli_es xnli_fr xnli_hi xnli_ru xnli_sw xnli_th
xnli_tr xnli_ur xnli_vi xnli_zh pawsx_de pawsx_en pawsx_es pawsx_fr pawsx_ja pawsx_ko pawsx_zh csn_ccr_go
csn_ccr_java csn_ccr_javascript csn_ccr_php csn_ccr_python csn_ccr_ruby csn_go csn_java csn_javascript csn_php
csn_python csn_ruby cosqa synthetic_text2sql codefeedback_mt codefeedback_st stackoverflow_qa ocgi ocgi_part2
ocr2_cpp ocr2_python xcodeeval_code2code_C# xcodeeval_code2code_C++ xcodeeval_code2code_C xcodeeval_code2code_D
xcodeeval_code2code_Go xcodeeval_code2code_Haskell xcodeeval_code2code_Java xcodeeval_code2code_Javascript
xcodeeval_code2code_Kotlin xcodeeval_code2code_Ocaml xcodeeval_code2code_PHP xcodeeval_code2code_Pascal
xcodeeval_code2code_Perl xcodeeval_code2code_Python xcodeeval_code2code_Ruby xcodeeval_code2code_Rust
xcodeeval_code2code_Scala xcodeeval_nl2code_C# xcodeeval_nl2code_C++ xcodeeval_nl2code_C xcodeeval_nl2code_D
xcodeeval_nl2code_Go xcodeeval_nl2code_Haskell xcodeeval_nl2code_Java xcodeeval_nl2code_Javascript
xcodeeval_nl2code_Kotlin xcodeeval_nl2code_Ocaml xcodeeval_nl2code_PHP xcodeeval_nl2code_Pascal
xcodeeval_nl2code_Perl xcodeeval_nl2code_Python xcodeeval_nl2code_Ruby xcodeeval_nl2code_Rust
xcodeeval_nl2code_Scala procqa paracrawl_so-en paracrawl_en-sw paracrawl_sw-en paracrawl_en-tg paracrawl_en-azj
paracrawl_tg-en paracrawl_en-th paracrawl_azj-en paracrawl_th-en paracrawl_en-tl paracrawl_en-hi paracrawl_tl-en
paracrawl_en-uk paracrawl_hi-en paracrawl_uk-en paracrawl_en-vi paracrawl_en-hy paracrawl_vi-en paracrawl_en-zh
paracrawl_zh-en paracrawl_hy-en paracrawl_es-ca paracrawl_ca-es paracrawl_en-id paracrawl_es-eu paracrawl_id-en
paracrawl_eu-es paracrawl_es-gl paracrawl_gl-es paracrawl_en-km paracrawl_nl-fr paracrawl_fr-nl paracrawl_pl-cs
paracrawl_km-en paracrawl_cs-pl paracrawl_pl-de paracrawl_en-ko paracrawl_de-pl paracrawl_ko-en paracrawl_en-lo
paracrawl_lo-en paracrawl_en-my paracrawl_my-en paracrawl_en-ne paracrawl_ne-en paracrawl_en-ps paracrawl_ps-en
paracrawl_en-ru paracrawl_ru-en paracrawl_en-si paracrawl_si-en paracrawl_en-so natural_reasoning
natural_reasoning_part2 multialpaca coig oasst2 wildchat wildchat_part2 wildchat_part3 m2lingual infinstruct
infinstruct_part2 cmedqav2 medinstruct huatuo_kgqa huatuo_encqa clirmatrix_af-bg clirmatrix_cv-fa clirmatrix_fi-ht
clirmatrix_ku-mk clirmatrix_pnb-sk clirmatrix_th-uk clirmatrix_ar-fr clirmatrix_en clirmatrix_hu-ko clirmatrix_ml-nl
clirmatrix_ru-it clirmatrix_ur-yo clirmatrix_bn-cs clirmatrix_es-pt clirmatrix_ja-de clirmatrix_nn-pms
clirmatrix_sl-tg clirmatrix_zh bq yahoo_answers dureader t2ranking gooaq medicalqa_ru medi2 medi2_part2 openorca
openorca_part2 medical_instruction multicpr_medical healthcaremagic multicpr_ecom ocnli esci cord19 cmcqa cmnli
dbpedia fever_nl hotpotqa_nl koalpaca koalpaca_realqa komagpie lawzhidao lcqmc lcsts llm_retrieval_data mailruqa
medical_flashcards medmcqa medqa_en medqa_zh medquad mscinli nordic_retrieval_danish nordic_retrieval_norwegian
nordic_retrieval_swedish nordic_sts_danish nordic_sts_norwegian nordic_sts_swedish nordic_text_matching_danish
nordic_text_matching_norwegian nordic_text_matching_swedish parsquad persian_qa pquad qbqtc refgpt ru_instruct
siberian_dataset simclue webmedqa wikiomnia mqa_ca mqa_lt mqa_nl mqa_sr mqa_es mqa_he mqa_id mqa_de mqa_lv mqa_vi
mqa_it mqa_sk mqa_ms mqa_hi mqa_zh mqa_hr mqa_th mqa_no mqa_is mqa_bg mqa_ru mqa_pl mqa_ja mqa_ro mqa_da mqa_sv
mqa_uk mqa_el mqa_pt mqa_et mqa_cs mqa_tr mqa_fr mqa_fa mqa_hu mqa_ko mqa_ar mqa_fi
""".split()
)
# 10 classification sources (F2LLM/utils.py CLASSIFICATION_DATASETS).
V2_CLASSIFICATION_SOURCES: tuple[str, ...] = tuple(
    """
amazon_counterfactual amazon_polarity imdb toxic_conversations cola mela waimai nordic_classification_danish
nordic_classification_swedish nordic_classification_norwegian
""".split()
)
# 33 clustering sources (F2LLM/utils.py CLUSTERING_DATASETS).
V2_CLUSTERING_SOURCES: tuple[str, ...] = tuple(
    """
amazon_reviews banking77 emotion mtop_intent mtop_domain massive_scenario massive_intent tweet_sentiment_extraction
arxiv_clustering_p2p arxiv_clustering_s2s biorxiv_clustering_p2p biorxiv_clustering_s2s medrxiv_clustering_p2p
medrxiv_clustering_s2s reddit_clustering_p2p reddit_clustering_s2s stackexchange_clustering_p2p
stackexchange_clustering_s2s twentynewsgroups sib200 mlsum_clustering_de mlsum_clustering_es mlsum_clustering_fr
mlsum_clustering_ru bactrianx_language_classification bactrianx_translation europarl xcodeeval_translation tnews
thucnews csl cedr ru_sentiment
""".split()
)
